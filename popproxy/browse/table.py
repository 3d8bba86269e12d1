"""The session list widget: a virtual table that renders only the rows on screen.

Textual's DataTable measures every cell of every row it is given; at 10,000 sessions that
alone takes seconds. Here a row costs nothing until it scrolls into view.
"""

from __future__ import annotations

from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from popproxy.browse.rows import COLUMNS, SessionRow

#: Width of each column in COLUMNS order (cells are cut with "…"); one space between.
WIDTHS = (19, 21, 21, 12, 8, 7, 5, 9, 10, 9, 14, 4, 4)
RIGHT = frozenset({"commands", "client_octets", "server_octets", "duration", "anomalies", "errors"})
HEADER_STYLE = Style(bold=True, underline=True)
CURSOR_STYLE = Style(reverse=True)


def line_text(cells: list[Text], style: Style | None = None) -> Text:
    """Cells laid out at the fixed widths."""
    line = Text(no_wrap=True, end="")
    for (key, _title), width, cell in zip(COLUMNS, WIDTHS, cells, strict=True):
        piece = cell.copy()
        piece.truncate(width, overflow="ellipsis")
        pad = width - piece.cell_len
        if key in RIGHT:
            line.append(" " * pad)
            line.append_text(piece)
        else:
            line.append_text(piece)
            line.append(" " * pad)
        line.append(" ")
    if style is not None:
        line.stylize(style)
    return line


class SessionTable(ScrollView, can_focus=True):
    """Rows of SessionRow; ``cells`` turns one into its cells when it is drawn."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("down,j", "move(1)", "down", show=False),
        Binding("up,k", "move(-1)", "up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("home,g", "jump(0)", "first", show=False),
        Binding("end,G", "jump(-1)", "last", show=False),
        Binding("enter", "select", "open", show=False),
    ]

    class Selected(Message):
        """Enter (or a click on the selected row) on a session."""

        def __init__(self, row: SessionRow) -> None:
            super().__init__()
            self.row = row

    class HeaderClicked(Message):
        def __init__(self, column: int) -> None:
            super().__init__()
            self.column = column

    def __init__(self, cells: object, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.cells = cells
        self.rows: list[SessionRow] = []
        self.cursor = 0
        self._index: dict[str, int] = {}

    # ------------------------------------------------------------------ data

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def set_rows(self, rows: list[SessionRow]) -> None:
        selected = self.selected
        self.rows = rows
        self._index = {row.key: i for i, row in enumerate(rows)}
        self.virtual_size = Size(sum(WIDTHS) + len(WIDTHS), len(rows) + 1)
        self.cursor = self._index.get(selected.key, 0) if selected is not None else 0
        self.cursor = min(self.cursor, max(0, len(rows) - 1))
        self.refresh()

    def index_of(self, key: str) -> int | None:
        return self._index.get(key)

    def updated(self, key: str) -> None:
        """Redraw the row of ``key`` if it is on screen."""
        index = self._index.get(key)
        if index is not None:
            self.refresh(Region(0, index + 1 - self.scroll_offset.y, self.size.width, 1))

    @property
    def selected(self) -> SessionRow | None:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def row_cells(self, index: int) -> list[Text]:
        return self.cells(self.rows[index])  # type: ignore[operator, no-any-return]

    def move_cursor(self, row: int) -> None:
        if not self.rows:
            return
        self.cursor = max(0, min(row, len(self.rows) - 1))
        top, height = int(self.scroll_offset.y), max(1, self.size.height - 1)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, force=True)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False, force=True)
        self.refresh()

    # ------------------------------------------------------------------ drawing

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        if y == 0:
            titles = [Text(title) for _key, title in COLUMNS]
            text = line_text(titles, HEADER_STYLE)
        else:
            index = scroll_y + y - 1
            if index >= len(self.rows):
                return Strip.blank(width)
            style = CURSOR_STYLE if index == self.cursor else None
            text = line_text(self.row_cells(index), style)
        segments = list(text.render(self.app.console))
        strip = Strip([s for s in segments if s.text != "\n"] or [Segment("")])
        return strip.crop_extend(scroll_x, scroll_x + width, None)

    # ------------------------------------------------------------------ input

    def action_move(self, step: int) -> None:
        self.move_cursor(self.cursor + step)

    def action_page(self, step: int) -> None:
        self.move_cursor(self.cursor + step * max(1, self.size.height - 2))

    def action_jump(self, where: int) -> None:
        self.move_cursor(where if where >= 0 else len(self.rows) - 1)

    def action_select(self) -> None:
        row = self.selected
        if row is not None:
            self.post_message(self.Selected(row))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            x = offset.x + self.scroll_offset.x
            edge = 0
            for column, width in enumerate(WIDTHS):
                edge += width + 1
                if x < edge:
                    self.post_message(self.HeaderClicked(column))
                    return
            return
        index = self.scroll_offset.y + offset.y - 1
        if 0 <= index < len(self.rows):
            if index == self.cursor:
                self.action_select()
            else:
                self.move_cursor(index)
