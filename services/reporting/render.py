"""Report output formats: json, csv, pdf (reportlab, with matplotlib charts) and excel (.xlsx).

Every renderer is a pure function of a `ReportDocument`; the PDF and xlsx ones are CPU work and
run in a worker thread. Charts use matplotlib's object API (no pyplot global state).
"""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from typing import Any

from services.reporting.reportdata import ReportDocument, Section
from services.reporting.windows import iso

CONTENT_TYPES = {
    "pdf": "application/pdf",
    "excel": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
}
EXTENSIONS = {"pdf": "pdf", "excel": "xlsx", "csv": "csv", "json": "json"}
FORMATS = tuple(CONTENT_TYPES)
_TOTAL_LABELS = {
    "cost": "Total cost (USD)",
    "requests": "Total requests",
    "tokens": "Total tokens",
    "errors": "Errors",
}


def render(document: ReportDocument, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(document.as_json(), indent=2).encode() + b"\n"
    if fmt == "csv":
        return _csv(document)
    if fmt == "excel":
        return _xlsx(document)
    return _pdf(document)


def _cell(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def _csv(document: ReportDocument) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["report", document.name])
    writer.writerow(["window_start", iso(document.window.start)])
    writer.writerow(["window_end", iso(document.window.end)])
    for key, value in document.totals.items():
        writer.writerow([f"total_{key}", _cell(value)])
    for section in document.sections:
        writer.writerow([])
        writer.writerow([f"# {section.title}"])
        if section.kind == "metrics":
            writer.writerow(["metric", "value"])
            writer.writerows([label, _cell(value)] for label, value in section.metrics)
        else:
            writer.writerow(section.columns)
            writer.writerows([_cell(v) for v in row] for row in section.rows)
    return out.getvalue().encode()


# ---------------------------------------------------------------------------------------------- excel
def _xlsx(document: ReportDocument) -> bytes:
    from openpyxl import Workbook
    from openpyxl.chart import BarChart, LineChart, Reference
    from openpyxl.styles import Font

    workbook = Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "Summary"
    bold = Font(bold=True)
    sheet.append([document.name])
    sheet["A1"].font = Font(bold=True, size=14)
    sheet.append(["Window start (UTC)", iso(document.window.start)])
    sheet.append(["Window end (UTC)", iso(document.window.end)])
    sheet.append(["Timezone", document.timezone])
    sheet.append([])
    sheet.append(["Totals"])
    sheet.cell(row=sheet.max_row, column=1).font = bold
    for key, value in document.totals.items():
        sheet.append([_TOTAL_LABELS.get(key, key), value])
    sheet.column_dimensions["A"].width = 34
    sheet.column_dimensions["B"].width = 24
    used: set[str] = {"Summary"}
    for section in document.sections:
        if section.kind == "metrics":
            sheet.append([])
            sheet.append([section.title])
            sheet.cell(row=sheet.max_row, column=1).font = bold
            for label, value in section.metrics:
                sheet.append([label, value])
            continue
        title = section.title[:28]
        name, number = title, 2
        while name in used:
            name, number = f"{title[:25]} {number}", number + 1
        used.add(name)
        table = workbook.create_sheet(name)
        table.append(section.columns)
        for cell in table[1]:
            cell.font = bold
        for row in section.rows:
            table.append(list(row))
        for index, _ in enumerate(section.columns):
            table.column_dimensions[chr(ord("A") + index)].width = 22 if index else 40
        if section.chart and section.rows and section.chart_columns:
            chart: BarChart | LineChart = BarChart() if section.chart == "bar" else LineChart()
            chart.title = section.title
            column = section.columns.index(section.chart_columns[0]) + 1
            data = Reference(table, min_col=column, min_row=1, max_row=len(section.rows) + 1)
            labels = Reference(table, min_col=1, min_row=2, max_row=len(section.rows) + 1)
            chart.add_data(data, titles_from_data=True)
            chart.set_categories(labels)
            chart.width, chart.height = 18, 9
            table.add_chart(chart, f"{chr(ord('A') + len(section.columns) + 1)}2")
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- pdf
_PALETTE = ["#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"]


def _chart_png(section: Section) -> bytes | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not section.chart or not section.rows or not section.chart_columns:
        return None
    labels = [str(row[0]) for row in section.rows]
    figure = Figure(figsize=(7.2, 3.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for index, column in enumerate(section.chart_columns[:2]):
        position = section.columns.index(column)
        values = [float(row[position]) for row in section.rows]
        target = axes if index == 0 else axes.twinx()
        color = _PALETTE[index]
        if section.chart == "line":
            target.plot(range(len(values)), values, marker="o", markersize=3, color=color, label=column)
            target.fill_between(range(len(values)), values, alpha=0.12, color=color)
        else:
            colors = [_PALETTE[i % len(_PALETTE)] for i in range(len(values))]
            target.barh(range(len(values)), values, color=colors)
            target.invert_yaxis()
        target.set_ylabel(column) if section.chart == "line" else target.set_xlabel(column)
        target.spines[["top"]].set_visible(False)
        if section.chart == "bar":
            break
    step = max(1, len(labels) // 8)
    if section.chart == "line":
        axes.set_xticks(range(0, len(labels), step), [labels[i] for i in range(0, len(labels), step)], fontsize=7)
        axes.grid(axis="y", alpha=0.3)
    else:
        axes.set_yticks(range(len(labels)), [label[:28] for label in labels], fontsize=7)
        axes.grid(axis="x", alpha=0.3)
    axes.set_title(section.title, fontsize=10, loc="left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _pdf(document: ReportDocument) -> bytes:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    buffer = io.BytesIO()
    pdf = SimpleDocTemplate(buffer, pagesize=A4, title=document.name, leftMargin=1.6 * cm, rightMargin=1.6 * cm)
    story: list[Any] = [
        Paragraph(document.name, styles["Title"]),
        Paragraph(
            f"{iso(document.window.start)} to {iso(document.window.end)} (UTC) · timezone {document.timezone}",
            styles["Normal"],
        ),
        Spacer(1, 0.4 * cm),
    ]
    style = TableStyle(
        [
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#1e3a8a")),
            ("TEXTCOLOR", (0, 0), (-1, 0), colors.white),
            ("FONTSIZE", (0, 0), (-1, -1), 8),
            ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#eef2ff")]),
            ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#c7d2fe")),
            ("ALIGN", (1, 1), (-1, -1), "RIGHT"),
        ]
    )
    totals = [["Total", "Value"]] + [[_TOTAL_LABELS.get(k, k), str(v)] for k, v in document.totals.items()]
    story += [Table(totals, hAlign="LEFT", style=style), Spacer(1, 0.5 * cm)]
    for section in document.sections:
        story.append(Paragraph(section.title, styles["Heading2"]))
        if section.note:
            story.append(Paragraph(section.note, styles["Italic"]))
        if section.kind == "metrics":
            rows = [["Metric", "Value"]] + [[label, str(value)] for label, value in section.metrics]
            story += [Table(rows, hAlign="LEFT", style=style), Spacer(1, 0.4 * cm)]
            continue
        png = _chart_png(section)
        if png is not None:
            story.append(Image(io.BytesIO(png), width=17 * cm, height=7.1 * cm))
        shown = section.rows[:40]
        rows = [section.columns] + [[str(_cell(v))[:40] for v in row] for row in shown]
        if len(rows) == 1:
            rows.append(["(no data)"] + [""] * (len(section.columns) - 1))
        story += [Table(rows, hAlign="LEFT", style=style, repeatRows=1), Spacer(1, 0.4 * cm)]
        if len(section.rows) > len(shown):
            story.append(
                Paragraph(f"{len(section.rows) - len(shown)} more rows in the csv/excel output.", styles["Italic"])
            )
    pdf.build(story)
    return buffer.getvalue()
