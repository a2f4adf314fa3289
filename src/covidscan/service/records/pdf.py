"""The PDF report for a referring doctor (reportlab): who and what, the images with their Grad-CAM overlays,
the model's calibrated result with its threshold and uncertainty, warnings, the site's local validation,
the doctor's verdict and its history, the model card's intended use and :data:`.content.NOT_A_DIAGNOSIS`.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image as PILImage
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from covidscan.service.records.content import (
    FINDING_WORDS,
    NOT_A_DIAGNOSIS,
    CaseRecord,
    plain,
    site_summary,
    status_words,
)

MAX_IMAGES = 8  # a CT series has many slices: the report shows the first ones and says how many more
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")  # Unicode text (names, comments); else Helvetica


def _fonts() -> tuple[str, str]:
    """The regular and bold font names: DejaVu Sans where installed (any script), else Helvetica."""
    regular, bold = DEJAVU / "DejaVuSans.ttf", DEJAVU / "DejaVuSans-Bold.ttf"
    if not (regular.is_file() and bold.is_file()):
        return "Helvetica", "Helvetica-Bold"
    if "DejaVuSans" not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont("DejaVuSans", str(regular)))
        pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(bold)))
    return "DejaVuSans", "DejaVuSans-Bold"


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def report_pdf(record: CaseRecord) -> bytes:
    """The report of the record's current version as PDF bytes."""
    font, bold = _fonts()
    base = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=base["BodyText"], fontName=font, fontSize=9.5, leading=12.5)
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10, textColor=colors.HexColor("#444444"))
    head = ParagraphStyle(
        "head", parent=base["Heading2"], fontName=bold, fontSize=12, spaceBefore=8, spaceAfter=4
    )
    title = ParagraphStyle("title", parent=base["Title"], fontName=bold, fontSize=16, alignment=0)
    warn = ParagraphStyle("warn", parent=body, fontName=bold, textColor=colors.HexColor("#9a2b00"))

    def p(text: str, style: ParagraphStyle = body) -> Paragraph:
        return Paragraph(escape(text), style)

    m = record.model
    status = status_words(record)
    story = [
        p(f"covidscan result — case {record.case_id}", title),
        p(
            status,
            ParagraphStyle(
                "status", parent=warn if not record.signed else body, fontName=bold, fontSize=12, leading=15
            ),
        ),
        p(
            f"{NOT_A_DIAGNOSIS} It supports a doctor's reading of the images; the doctor's verdict is "
            "the result.",
            small,
        ),
        Spacer(1, 3 * mm),
    ]
    facts = [
        ("Patient id", record.patient_id or "— (none sent)"),
        ("Case id", str(record.case_id)),
        ("Received", _when(record.created_at)),
        ("Site", site_summary(record.site)),
        (
            "Model",
            f"{m.run} ({m.model_name}, {m.modality.upper()}, covidscan {m.covidscan_version}); "
            f"weights SHA-256 {(m.weights_sha256 or 'unknown')[:16]}…",
        ),
    ]
    table = Table([[p(k, small), p(v)] for k, v in facts], colWidths=[28 * mm, 150 * mm])
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]))
    story += [table, p("Model result", head)]
    band = (
        f"; uncertain within ±{m.band / 2:.3f} of the image threshold {m.threshold:.3f}"
        if m.band and m.threshold is not None
        else ""
    )
    story.append(
        p(
            f"Calibrated probability of COVID-19: {record.p_covid:.3f} (patient threshold "
            f"{record.group_threshold:.3f}) → {FINDING_WORDS[record.label]}{band}."
        )
    )
    if record.uncertain:
        story.append(
            p(
                "Uncertain: at least one image lies in the uncertainty band around the threshold; "
                "the label should not be trusted on its own.",
                warn,
            )
        )
    for w in record.warnings:
        story.append(p(f"Warning: {w}", warn))

    story.append(p("Doctor's verdict", head))
    v = record.verdict
    if v is None:
        story.append(
            p("No verdict yet: NOT SIGNED — preliminary. The finding above is the model's alone.", warn)
        )
    else:
        signed = (
            f"signed by {v.doctor} at {_when(v.signed_at)}"
            if v.signed_at
            else f"draft by {v.doctor}: NOT SIGNED — preliminary"
        )
        story.append(
            p(
                f"Doctor's finding: {FINDING_WORDS[v.finding]} ({'agrees' if v.agree else 'disagrees'} with "
                f"the model); {signed}.",
                ParagraphStyle("finding", parent=body, fontName=bold),
            )
        )
        if v.comment.strip():
            story.append(p(f"Comment: {v.comment.strip()}"))
        if v.amendment_reason:
            story.append(p(f"Amended (version {v.version}): {v.amendment_reason}"))
    if record.history:
        story.append(p("Earlier versions", head))
        for old in reversed(record.history):
            when = _when(old.signed_at) if old.signed_at else "unsigned"
            story.append(
                p(
                    f"Version {old.version}: {FINDING_WORDS[old.finding]} by {old.doctor}, {when}"
                    + (f"; comment: {old.comment.strip()}" if old.comment.strip() else ""),
                    small,
                )
            )

    story.append(p("Images (Grad-CAM overlay: where the model looked)", head))
    cells = []
    for image in record.images[:MAX_IMAGES]:
        pixels = image.overlay()
        caption = f"{image.position + 1}. {image.name[:40]}"
        if image.error:
            caption += f" — not read: {image.error}"
        elif image.p_covid is not None:
            caption += f" — p {image.p_covid:.3f}{' (uncertain)' if image.uncertain else ''}"
        if pixels is None:
            picture = PILImage.open(io.BytesIO(image.display_png)).convert("RGB")
        else:
            picture = PILImage.fromarray(pixels)
        picture.thumbnail((400, 400))
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        width = 42 * mm
        height = width * picture.height / picture.width
        cells.append([Image(io.BytesIO(buf.getvalue()), width=width, height=height), p(caption, small)])
    rows = [cells[i : i + 4] + [[]] * (4 - len(cells[i : i + 4])) for i in range(0, len(cells), 4)]
    story.append(Table(rows, colWidths=[45 * mm] * 4, style=[("VALIGN", (0, 0), (-1, -1), "TOP")]))
    if len(record.images) > MAX_IMAGES:
        story.append(p(f"… and {len(record.images) - MAX_IMAGES} more image(s) (see the case page).", small))

    story.append(p("Intended use (from the model card)", head))
    for line in m.intended_use or ("The model card could not be read (the run's folder is missing).",):
        story.append(p(plain(line.lstrip("- ")), small))
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        leftMargin=15 * mm,
        rightMargin=15 * mm,
        topMargin=14 * mm,
        bottomMargin=14 * mm,
        title=f"covidscan case {record.case_id}",
        author="covidscan",
        subject=status,
        creator="covidscan",
    )
    footer = f"covidscan case {record.case_id}: {status}. {NOT_A_DIAGNOSIS}"

    def on_page(canvas: Canvas, document: SimpleDocTemplate) -> None:
        """Every page says what it is and that it is not a diagnosis on its own."""
        canvas.saveState()
        canvas.setFont(bold, 8)
        canvas.setFillColor(colors.HexColor("#9a2b00"))
        canvas.drawString(15 * mm, 8 * mm, footer)
        canvas.drawRightString(A4[0] - 15 * mm, 8 * mm, f"page {document.page}")
        canvas.restoreState()

    doc.build(story, onFirstPage=on_page, onLaterPages=on_page)
    return buf.getvalue()
