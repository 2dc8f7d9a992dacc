"""Write a benchmark's results into a Markdown file, between markers, so one
table can be re-measured without touching the rest of the file."""


def write_between_markers(path, key, text, title):
    """Put `text` between `<!-- key:start -->` and `<!-- key:end -->` in
    `path`, appending the block (to a new file headed `# title`) when the
    markers are missing."""
    start, end = (f"<!-- {key}:{edge} -->" for edge in ("start", "end"))
    block = f"{start}\n{text}\n{end}"
    old = path.read_text() if path.is_file() else f"# {title}\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + f"\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
