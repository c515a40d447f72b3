"""Copyable tables: a QTableWidget with Ctrl+C / Copy (tab-separated) and CSV export."""

from __future__ import annotations

import csv
from pathlib import Path

from qtpy.QtGui import QGuiApplication, QKeySequence
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem


class CopyableTable(QTableWidget):
    """Rows of text cells; Ctrl+C copies the selection (everything when nothing is selected)."""

    def __init__(self, headers: list[str], parent=None):
        super().__init__(0, len(headers), parent)
        self.setHorizontalHeaderLabels(headers)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.horizontalHeader().setStretchLastSection(True)

    def headers(self) -> list[str]:
        return [self.horizontalHeaderItem(c).text() for c in range(self.columnCount())]

    def set_rows(self, rows: list[list[str]]) -> None:
        self.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.setItem(r, c, QTableWidgetItem(text))

    def add_row(self, row: list[str]) -> int:
        r = self.rowCount()
        self.insertRow(r)
        for c, text in enumerate(row):
            self.setItem(r, c, QTableWidgetItem(text))
        return r

    def rows(self, selected_only: bool = False) -> list[list[str]]:
        chosen = {i.row() for i in self.selectedIndexes()} if selected_only else set()
        return [
            [self.item(r, c).text() if self.item(r, c) else "" for c in range(self.columnCount())]
            for r in range(self.rowCount())
            if not chosen or r in chosen
        ]

    def as_tsv(self, selected_only: bool = False) -> str:
        lines = [self.headers(), *self.rows(selected_only)]
        return "\n".join("\t".join(row) for row in lines) + "\n"

    def copy(self) -> str:
        """Copy the selected rows (all rows when none is selected) with the header, as TSV."""
        text = self.as_tsv(selected_only=bool(self.selectedIndexes()))
        QGuiApplication.clipboard().setText(text)
        return text

    def write_csv(self, path) -> Path:
        return write_csv(path, self.headers(), self.rows())

    def keyPressEvent(self, event):
        if event.matches(QKeySequence.StandardKey.Copy):
            self.copy()
            return
        super().keyPressEvent(event)


def write_csv(path, headers: list[str], rows: list[list[str]]) -> Path:
    """``headers`` then ``rows`` as a UTF-8 CSV file at ``path``."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(headers)
        writer.writerows(rows)
    return path
