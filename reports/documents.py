"""Benefit statements and the payroll export as files: CSV (the standard library's writer) and PDF
(fpdf2, with its built-in Helvetica: Latin-1 text, so other characters are replaced)."""

from __future__ import annotations

import csv
import io

from fpdf import FPDF

from reports.selectors import LINE_LABELS, PayrollRow, Statement

STATEMENT_COLUMNS = ["period", "employee_id", "email", "name", "team", "cost_centre", "currency"] + [
    f"{line}_{what}" for line in LINE_LABELS for what in ("tokens", "value")] + ["net_tokens", "net_value"]
PAYROLL_COLUMNS = ["period", "employee_id", "email", "cost_centre", "team", "tokens_granted", "tokens_used",
                   "value_granted", "value_used", "currency"]


def _safe(value) -> str:
    """A spreadsheet must not run a cell as a formula (CSV injection): text starting with one of
    = + - @ (and tab or CR) gets a leading apostrophe. Numbers are written as they are."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _writer(buffer):
    return csv.writer(buffer, lineterminator="\r\n")


def statements_csv(statements: list[Statement]) -> bytes:
    buffer = io.StringIO()
    writer = _writer(buffer)
    writer.writerow(STATEMENT_COLUMNS)
    for item in statements:
        cells = [f"{item.period_start:%Y-%m}", _safe(item.employee_id), _safe(item.email), _safe(item.name),
                 _safe(item.team), _safe(item.cost_centre), item.currency]
        for line in item.lines:
            cells += [line.tokens, line.value]
        writer.writerow(cells + [item.net_tokens, item.net_value])
    return buffer.getvalue().encode()


def payroll_csv(rows: list[PayrollRow], period) -> bytes:
    buffer = io.StringIO()
    writer = _writer(buffer)
    writer.writerow(PAYROLL_COLUMNS)
    for row in rows:
        writer.writerow([f"{period:%Y-%m}", _safe(row.employee_id), _safe(row.email), _safe(row.cost_centre),
                         _safe(row.team), row.tokens_granted, row.tokens_used, row.value_granted, row.value_used,
                         row.currency])
    return buffer.getvalue().encode()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def statement_pdf(item: Statement, *, organization_name: str) -> bytes:
    """One A4 page. Text is placed with fpdf2's `text` (no cell layout): a whole organization's
    statements are made in one task, and cells cost several times more."""
    pdf = FPDF(format="A4", unit="mm")
    pdf.set_title(_latin1(f"Benefit statement {item.period_start:%Y-%m}"))
    pdf.add_page()
    left, label_col, tokens_right, value_right = 15, 60, 140, 190

    def right(x, y, text):
        pdf.text(x - pdf.get_string_width(text), y, text)

    pdf.set_font("helvetica", "B", 15)
    pdf.text(left, 20, _latin1(f"Benefit statement: AI token allowance, {item.period_start:%B %Y}"))
    pdf.set_font("helvetica", size=10)
    y = 32
    for label, value in (("Organization", organization_name), ("Member", f"{item.name} <{item.email}>".strip()),
                         ("Employee id", item.employee_id or "-"), ("Team", item.team or "-"),
                         ("Cost centre", item.cost_centre or "-"), ("Currency", item.currency)):
        pdf.text(left, y, _latin1(label))
        pdf.text(label_col, y, _latin1(value))
        y += 6
    y += 6
    pdf.set_font("helvetica", "B", 10)
    pdf.text(left, y, "Line")
    right(tokens_right, y, "Tokens")
    right(value_right, y, f"Value ({item.currency})")
    pdf.line(left, y + 2, value_right, y + 2)
    pdf.set_font("helvetica", size=10)
    for line in item.lines:
        y += 7
        pdf.text(left, y, _latin1(line.label))
        right(tokens_right, y, f"{line.tokens:,}")
        right(value_right, y, f"{line.value:,}")
    pdf.line(left, y + 3, value_right, y + 3)
    y += 9
    pdf.set_font("helvetica", "B", 10)
    pdf.text(left, y, "Net change of the balance")
    right(tokens_right, y, f"{item.net_tokens:,}")
    right(value_right, y, f"{item.net_value:,}")
    pdf.set_font("helvetica", size=8)
    pdf.text(left, y + 12, "Values are at the organization's catalog prices. Each line is the sum of the ledger entries of")
    pdf.text(left, y + 16, "the period of its kinds; the net change is the sum of the lines.")
    return bytes(pdf.output())


def statement_filename(item: Statement, extension: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in item.email)
    return f"statement-{item.period_start:%Y-%m}-{safe}.{extension}"
