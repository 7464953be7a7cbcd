"""An HTML page as a browser would see it: its elements, the attributes
that could run code, its scripts and its text."""

from __future__ import annotations

from html.parser import HTMLParser

# Every element the usage and status page itself writes.
PAGE_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "nav", "a", "h1", "h2"}
PAGE_TAGS |= {"h3", "p", "b", "small", "pre", "code", "ol", "ul", "li", "table", "tr", "th"}
PAGE_TAGS |= {"td", "div", "button", "section", "meter", "span", "figure", "figcaption"}
PAGE_TAGS |= {"svg", "title", "line", "rect", "text", "script"}


class PageText(HTMLParser):
    """The elements of an HTML page and its text as a browser would show it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text = ""
        self.scripts: list[str] = []
        # Attributes that run code or load something: on*, and URLs outside the page.
        self.active: list[tuple[str, str, str | None]] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        for name, value in attrs:
            if name.startswith("on") or (
                name in ("href", "src") and value not in ("data:,",) and not value.startswith("?")
            ):
                self.active.append((tag, name, value))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text += data


def parse(body: bytes) -> PageText:
    page = PageText()
    page.feed(body.decode())
    page.close()
    return page
