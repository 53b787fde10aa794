"""Draws the node pack's registry icon, ``docs/images/icon.png``: a grid of latent cells (blue),
three of them split 2x2 into detail cells (orange), the picture of a DA latent.

    python tools/draw_icon.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "icon.png"
SIZE, PAD, CELLS = 256, 28, 4
DETAIL_CELLS = {(2, 1), (3, 2), (1, 3)}


def main() -> None:
    im = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.rounded_rectangle([0, 0, SIZE - 1, SIZE - 1], radius=40, fill=(24, 32, 48, 255))
    cell = (SIZE - 2 * PAD) // CELLS
    for i in range(CELLS):
        for j in range(CELLS):
            x, y = PAD + i * cell, PAD + j * cell
            if (i, j) in DETAIL_CELLS:
                h = cell // 2
                for a in range(2):
                    for b in range(2):
                        shade = (245, 150 + 30 * ((a + b) % 2), 60, 255)
                        d.rounded_rectangle([x + a * h + 3, y + b * h + 3, x + (a + 1) * h - 3, y + (b + 1) * h - 3],
                                            radius=4, fill=shade)
            else:
                d.rounded_rectangle([x + 4, y + 4, x + cell - 4, y + cell - 4], radius=8, fill=(70, 130, 200, 255))
    im.save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
