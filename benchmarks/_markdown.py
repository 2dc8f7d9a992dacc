"""Write a benchmark's results into a Markdown file, between markers, so one
table can be re-measured without touching the rest of the file."""


def write_between_markers(path, key, text, title, *, after=None):
    """Put `text` between `<!-- key:start -->` and `<!-- key:end -->` in
    `path`. Where the markers are missing the block is added: after the last
    end marker whose key starts with `after` (so blocks of one kind stay
    together), else at the end of the file (a new file is headed `# title`)."""
    start, end = (f"<!-- {key}:{edge} -->" for edge in ("start", "end"))
    block = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.is_file() else f"# {title}\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        anchor = old.rfind(f"<!-- {after}") if after else -1
        anchor = old.find(":end -->", anchor) if anchor >= 0 else -1
        if anchor >= 0:
            cut = anchor + len(":end -->")
            new = old[:cut] + f"\n\n{block}" + old[cut:]
        else:
            new = old.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
