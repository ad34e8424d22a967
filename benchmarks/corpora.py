#!/usr/bin/env python
"""Real English text from Debian packages, for the embedded sample and for benchmarks.

    python benchmarks/corpora.py sample      # rebuild pipeline/resources/sample_corpus/ (committed)
    python benchmarks/corpora.py benchmark   # benchmarks/corpus/: >= 50 MB the tests never use
    python benchmarks/corpora.py long        # benchmarks/corpus/long/: >= 100 MB of whole manual pages

Sources (fetched with `apt-get download`, no root needed to unpack):
- python3.11-doc: the reStructuredText sources of the CPython documentation (PSF License). The tutorial
  and FAQ become the sample's "articles" (Wikipedia-style sections, JSON Lines); the HOWTOs its
  "book" text (paragraphs separated by blank lines, zstd). The benchmark uses the other parts.
- dict-gcide: the GNU Collaborative International Dictionary of English (40 MB of 1913 Webster entries,
  blank-line separated; it contains real invalid UTF-8, which the pipeline repairs). Benchmark only.
- perl-doc: the POD manual pages of Perl 5 (perlfunc, perlfaq, perlre, release notes; GPL/Artistic),
  as blank-line separated paragraphs with POD commands and formatting codes removed (indented code
  examples kept, as in any documentation corpus). Benchmark only: brings the corpus over 50 MB.

The long-document corpus (`long`) is what users prepare: Wikipedia-like articles of hundreds to thousands of
tokens, one whole page of a manual per document, as JSON Lines ({"title", "text"}, one page per line, as
Wikipedia dumps are usually distributed). Sources, all Debian documentation packages:
- reStructuredText sources (Sphinx `_sources`) of the Linux kernel documentation (linux-doc-6.1, GPL-2),
  the CPython documentation but the parts the sample uses (python3.11-doc, PSF), the pandas and SageMath
  documentation (python-pandas-doc, sagemath-doc: English pages; BSD/GPL) and Sphinx's (sphinx-doc, BSD);
- HTML manuals as text: PostgreSQL 15 (postgresql-doc-15, PostgreSQL licence), Racket (racket-doc,
  MIT/Apache), Erlang/OTP (erlang-doc, Apache-2.0), Django (python-django-doc, BSD) and Rust (rust-doc,
  MIT/Apache: the books and the standard library's pages, without source listings) and the Java 17 API
  (openjdk-17-doc, GPL-2 with the Classpath exception: one page per class or package).
Pages with fewer than 1,000 characters (indexes, stubs) are left out.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(ROOT, "pipeline", "resources", "sample_corpus")
BENCH_DIR = os.path.join(ROOT, "benchmarks", "corpus")
DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
SAMPLE_PARTS = ("tutorial", "faq", "howto")

_HEADING = re.compile(r"^([=\-~^\"'`#*+<>])\1{3,}\s*$")
_ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_NOT_TEXT_DIRECTIVES = {"code-block", "code", "sourcecode", "literalinclude", "image", "figure", "toctree", "raw",
                        "highlight", "only", "include", "kernel-doc", "kernel-include", "kernel-abi", "csv-table",
                        "flat-table", "list-table", "table", "math", "graphviz", "ipython", "plot", "doctest",
                        "testcode", "testoutput", "autosummary", "automodule", "autoclass", "autofunction"}
_POD_CODE = re.compile(r"[A-Z]<(?:<+\s)?([^<>]*?)(?:\s>+)?>")


def fetch_debs(packages, dest: str) -> str:
    """apt-get download the packages into a temporary folder and unpack them under `dest`."""
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    return dest


def rst_to_text(rst: str, keep_directives: bool = False) -> list[tuple[str, str]]:
    """(title, text) sections of a reStructuredText page with markup, directives and code removed.
    `keep_directives`: keep the text of directives other than code, images and tables of contents (their
    argument, e.g. a function's signature, and their body, e.g. its description)."""
    lines = rst.splitlines()
    sections, title, body = [], "", []
    skip_indent = None  # skipping an indented block (directive body or literal block)
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                i += 1
                continue
        if stripped.startswith(".. "):
            name, is_directive, argument = stripped[3:].partition("::")
            if keep_directives and is_directive and name.strip() not in _NOT_TEXT_DIRECTIVES:
                body.append(_clean_inline(argument.strip()))
            else:
                skip_indent = indent
            i += 1
            continue
        if i + 1 < len(lines) and _HEADING.match(lines[i + 1]) and stripped and not _HEADING.match(line):
            if body:
                sections.append((title, "\n".join(body).strip()))
            title, body = _clean_inline(stripped), []
            i += 2
            continue
        if _HEADING.match(line) or stripped.startswith((">>>", "...", "$ ")):
            i += 1
            continue
        if stripped.endswith("::"):
            line = line.rstrip()[:-1].rstrip(":") + ("." if not line.rstrip().endswith(" ::") else "")
            skip_indent = indent
        body.append(_clean_inline(line.strip()))
        i += 1
    if body:
        sections.append((title, "\n".join(body).strip()))
    out = []
    for t, text in sections:
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > 200:
            out.append((t, text))
    return out


def _clean_inline(s: str) -> str:
    s = _LINK.sub(r"\1", s)
    s = _ROLE.sub(r"\1", s)
    s = _LITERAL.sub(r"\1", s)
    return s.replace("*", "").replace("|", "")


def pod_paragraphs(pod: str) -> list[str]:
    """Paragraphs of a POD page: headings and items as text, other commands dropped, formatting codes
    (C<...>, L<...>, B<<< ... >>>) replaced by their text, indented code paragraphs kept as they are."""
    out = []
    for para in re.split(r"\n[ \t]*\n", pod):
        if not para.strip():
            continue
        if para.startswith("="):
            cmd, _, rest = para.partition(" ")
            if not cmd.startswith(("=head", "=item")) or not rest.strip():
                continue
            para = rest
        if para[:1] not in (" ", "\t"):
            prev = None
            while prev != para:
                prev, para = para, _POD_CODE.sub(r"\1", para)
        out.append(para.rstrip())
    return out


LONG_DIR = os.path.join(BENCH_DIR, "long")
LONG_RST = {  # package: its Sphinx _sources folder
    "linux-doc-6.1": "usr/share/doc/linux-doc-6.1/html/_sources",
    "python3.11-doc": DOC_SOURCES,
    "python-pandas-doc": "usr/share/doc/python-pandas-doc/html/_sources",
    "sagemath-doc": "usr/share/doc/sagemath/html/en",
    "sphinx-doc": "usr/share/doc/sphinx-doc/html/_sources",
}
LONG_HTML = {  # package: its folder of HTML pages
    "postgresql-doc-15": "usr/share/doc/postgresql-doc-15/html",
    "racket-doc": "usr/share/doc/racket",
    "erlang-doc": "usr/share/doc/erlang-doc",
    "python-django-doc": "usr/share/doc/python-django-doc/html",
    "rust-doc": "usr/share/doc/rust-doc/html",
    "openjdk-17-doc": "usr/share/doc/openjdk-17-jre-headless/api",
}
# indexes, source listings, usage and tree lists: not text
HTML_SKIP = ("genindex.html", "search.html", "py-modindex.html", "all.html", "/src/", "/class-use/", "/index-files/",
             "-tree.html", "allclasses", "allpackages", "-use.html", "serialized-form", "/legal/")
MIN_PAGE_CHARS = 1000


class _HtmlText(html.parser.HTMLParser):
    """The readable text of an HTML page: block elements become paragraphs (blank-line separated); scripts,
    styles, navigation, headers, footers and sidebars are left out."""

    SKIP = {"script", "style", "nav", "header", "footer", "aside", "head", "noscript", "button", "form"}
    BLOCK = {"p", "div", "section", "article", "li", "dt", "dd", "tr", "pre", "blockquote", "h1", "h2", "h3", "h4",
             "h5", "h6", "table", "br", "hr", "ul", "ol", "dl"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", "".join(self.parts)))
        return "\n\n".join(p for p in paragraphs if p)


def html_to_text(page: str) -> str:
    parser = _HtmlText()
    parser.feed(page)
    parser.close()
    return parser.text()


def _long_pages(unpacked: str):
    """(package/relative path, text) of every page of the long-document sources."""
    for package, folder in LONG_RST.items():
        root = os.path.join(unpacked, folder)
        for path in sorted(glob.glob(os.path.join(root, "**", "*.txt"), recursive=True)):
            rel = os.path.relpath(path, root)
            if package == "python3.11-doc" and rel.split(os.sep)[0] in SAMPLE_PARTS:
                continue  # the sample (and so the tests) use these
            if package == "sagemath-doc" and "_sources" not in rel:
                continue
            rst = open(path, encoding="utf-8", errors="replace").read()
            yield f"{package}/{rel}", "\n\n".join(text for _, text in rst_to_text(rst, keep_directives=True))
    for package, folder in LONG_HTML.items():
        for path in sorted(glob.glob(os.path.join(unpacked, folder, "**", "*.html"), recursive=True)):
            if any(part in path for part in HTML_SKIP):
                continue
            page = open(path, encoding="utf-8", errors="replace").read()
            yield f"{package}/{os.path.relpath(path, os.path.join(unpacked, folder))}", html_to_text(page)


def build_long(workdir: str) -> None:
    unpacked = fetch_debs(list(LONG_RST) + list(LONG_HTML), workdir)
    os.makedirs(LONG_DIR, exist_ok=True)
    pages = chars = 0
    with open(os.path.join(LONG_DIR, "manuals.jsonl"), "w", encoding="utf-8") as f:
        for title, text in _long_pages(unpacked):
            if len(text) >= MIN_PAGE_CHARS:
                f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
                pages += 1
                chars += len(text)
    size = os.path.getsize(os.path.join(LONG_DIR, "manuals.jsonl"))
    print(f"long-document corpus: {pages:,} pages, {chars:,} characters ({chars // max(pages, 1):,} per page), "
          f"{size / 1e6:.1f} MB in {LONG_DIR}")


def build_sample(workdir: str) -> None:
    root = os.path.join(fetch_debs(["python3.11-doc"], workdir), DOC_SOURCES)
    os.makedirs(SAMPLE_DIR, exist_ok=True)
    articles = []
    for part in ("tutorial", "faq"):
        for path in sorted(glob.glob(os.path.join(root, part, "*.rst.txt"))):
            page = os.path.basename(path).split(".")[0]
            for title, text in rst_to_text(open(path, encoding="utf-8").read()):
                articles.append({"title": f"{part}/{page}: {title}", "text": text})
    with gzip.GzipFile(os.path.join(SAMPLE_DIR, "articles.jsonl.gz"), "wb", mtime=0) as f:
        for a in articles:
            f.write((json.dumps(a, ensure_ascii=False) + "\n").encode())
    paragraphs = []
    for path in sorted(glob.glob(os.path.join(root, "howto", "*.rst.txt"))):
        for _, text in rst_to_text(open(path, encoding="utf-8").read()):
            paragraphs += [p.replace("\n", " ") for p in text.split("\n\n") if len(p) > 80]
    import zstandard

    data = "\n\n".join(paragraphs).encode() + b"\n"
    with open(os.path.join(SAMPLE_DIR, "howto.txt.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor(level=19).compress(data))
    print(f"sample: {len(articles)} articles, {len(paragraphs)} paragraphs, "
          f"{sum(len(a['text']) for a in articles) + len(data):,} characters -> {SAMPLE_DIR}")


def build_benchmark(workdir: str) -> None:
    unpacked = fetch_debs(["python3.11-doc", "dict-gcide", "perl-doc"], workdir)
    os.makedirs(BENCH_DIR, exist_ok=True)
    with gzip.open(os.path.join(unpacked, "usr/share/dictd/gcide.dict.dz"), "rb") as src, \
            open(os.path.join(BENCH_DIR, "gcide.txt"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    docs = []
    root = os.path.join(unpacked, DOC_SOURCES)
    for path in sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] in SAMPLE_PARTS:  # the sample (and so the tests) use these
            continue
        for title, text in rst_to_text(open(path, encoding="utf-8").read()):
            docs.append(json.dumps({"title": f"{rel}: {title}", "text": text}, ensure_ascii=False))
    with open(os.path.join(BENCH_DIR, "pydocs.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    with open(os.path.join(BENCH_DIR, "perldoc.txt"), "w", encoding="utf-8") as f:
        for path in sorted(glob.glob(os.path.join(unpacked, "usr/share/perl/*/pod/*.pod"))):
            for para in pod_paragraphs(open(path, encoding="utf-8", errors="replace").read()):
                f.write(para + "\n\n")
    total = sum(os.path.getsize(os.path.join(BENCH_DIR, n)) for n in os.listdir(BENCH_DIR))
    print(f"benchmark corpus: {total / 1e6:.1f} MB in {BENCH_DIR}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=("sample", "benchmark", "long"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        {"sample": build_sample, "benchmark": build_benchmark, "long": build_long}[args.which](tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
