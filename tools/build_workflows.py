"""Writes the shipped workflows: a UI-format graph (ComfyUI's frontend opens it) and its
API-format twin (``POST /prompt``, headless runs) from one description, so the two cannot drift.

    python tools/build_workflows.py        # rewrites example_workflows/*.json and example_workflows/api/*.json

UI graphs sit directly in ``example_workflows/``: ComfyUI lists the ``*.json`` files directly
inside a custom node's ``example_workflows/`` folder in its workflow templates browser (0.3.64
and 0.8.0 alike; sub-folders are not listed), so the API twins sit in ``example_workflows/api/``.

Layout: nodes go in columns that read left to right (files, model, prompts, sampling, output);
each column stacks its nodes top-down with a gap that leaves room for the next node's title
bar, each column is framed by a group, the Note stands in its own column on the left, and the
saved view (``extra.ds``) frames the whole graph in a 1600x1000 window.  Node sizes are at
least what the frontends of ComfyUI 0.8.0 and 0.3.64 compute for each node (``tools/screenshot_workflows.py
--sizes`` prints both).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"

# Files the workflows expect (SD3.5 Medium from Stability AI; DA files from our trainers).
CKPT = "sd3.5_medium.safetensors"
CLIPS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
DA_VAE = "davae_sd35m.safetensors"
LORA_1024, HEADS_1024 = "da_sd35m_1024_lora.safetensors", "da_sd35m_1024_heads.safetensors"
LORA_2048, HEADS_2048 = "da_sd35m_2048_lora.safetensors", "da_sd35m_2048_heads.safetensors"
PROMPT = "a photograph of a red fox in a snowy birch forest at golden hour, highly detailed fur"
NEGATIVE = "blurry, low quality, deformed"

# Official download locations of the stock files, in the frontend's missing-models format
# (``properties.models`` on the loader node).  The repository is gated: accept Stability AI's
# licence on its page first.
SD35M_REPO = "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main"
STOCK_MODELS = {
    "CheckpointLoaderSimple": [{"name": CKPT, "url": f"{SD35M_REPO}/{CKPT}", "directory": "checkpoints"}],
    "TripleCLIPLoader": [{"name": c, "url": f"{SD35M_REPO}/text_encoders/{c}", "directory": "text_encoders"} for c in CLIPS],
}

# Socket types per node type: (linked inputs in order, widget names in order, output types).
# Widget order is the node's input order; ``seed`` also carries the frontend's control_after_generate.
NODE_TYPES: dict[str, tuple[list[tuple[str, str]], list[str], list[str]]] = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], ["MODEL", "CLIP", "VAE"]),
    "TripleCLIPLoader": ([], ["clip_name1", "clip_name2", "clip_name3"], ["CLIP"]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], ["CONDITIONING"]),
    "LoraLoaderModelOnly": ([("model", "MODEL")], ["lora_name", "strength_model"], ["MODEL"]),
    "ModelSamplingSD3": ([("model", "MODEL")], ["shift"], ["MODEL"]),
    "DASD3ModelPatch": ([("model", "MODEL")], ["heads"], ["MODEL"]),
    "DAEmptyStructuredLatent": ([], ["width", "height", "batch_size"], ["LATENT"]),
    "EmptySD3LatentImage": ([], ["width", "height", "batch_size"], ["LATENT"]),
    "KSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        ["LATENT"],
    ),
    "DAVAELoader": ([("vae", "VAE")], ["davae_name", "dtype"], ["VAE"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], ["IMAGE"]),
    "DAStructuredLatentEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], ["tile_size", "overlap"], ["LATENT"]),
    "DAStructuredLatentDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["tile_size", "overlap"], ["IMAGE"]),
    "DALatentFromBase": ([("samples", "LATENT")], [], ["LATENT"]),
    "DABaseLatent": ([("samples", "LATENT")], [], ["LATENT"]),
    "LoadImage": ([], ["image"], ["IMAGE", "MASK"]),
    "ImageScale": ([("image", "IMAGE")], ["upscale_method", "width", "height", "crop"], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
}
OPTIONAL_LINKS = {("DAVAELoader", "vae")}

# Node body sizes (width, height without the title bar): at least what the frontends of
# ComfyUI 0.8.0 and 0.3.64 compute for the node, so they do not grow it over its neighbours.
# Image nodes get room for the picture they show.
NODE_SIZE = {
    "CheckpointLoaderSimple": (360, 128), "TripleCLIPLoader": (360, 110), "CLIPTextEncode": (400, 180),
    "LoraLoaderModelOnly": (360, 112), "ModelSamplingSD3": (360, 58), "DASD3ModelPatch": (360, 58),
    "DAEmptyStructuredLatent": (360, 110), "EmptySD3LatentImage": (360, 110), "KSampler": (360, 262),
    "DAVAELoader": (360, 82), "VAEDecode": (360, 46), "DAStructuredLatentEncode": (360, 102),
    "DAStructuredLatentDecode": (360, 102), "DALatentFromBase": (360, 26), "DABaseLatent": (360, 26),
    "LoadImage": (360, 340), "ImageScale": (360, 130), "SaveImage": (360, 300), "PreviewImage": (360, 260),
}
NOTE_SIZE = (440, 330)

# Geometry of the frontend (LiteGraph): the title bar is drawn above ``pos``; a group's title
# strip sits inside its bounding box at the top.
TITLE_H = 30
GROUP_TITLE_H = 56  # room for the frontend's node-source badge above the first node
GROUP_PAD = 20
NODE_GAP = 30            # between one node's bottom and the next one's title bar
COLUMN_GAP = 60          # between neighbouring groups
WINDOW = (1600, 1000)    # the view the saved ``extra.ds`` must frame
# Parts of the window the frontend covers with its own bars (left sidebar, top tabs, workflow name and Run bar,
# bottom-right canvas controls): the saved view keeps the graph clear of them.
VIEW_MARGIN = {"left": 70, "top": 100, "right": 30, "bottom": 60}
MINIMAP = (1330, 730, 1600, 1000)  # the minimap 0.8.0's frontend shows bottom right, with a margin


class Graph:
    """One workflow: nodes in titled sections (groups); sections stack in columns read left to right."""

    def __init__(self, name: str, title: str, note: str):
        self.name, self.title, self.note = name, title, note
        self.nodes: list[dict] = []
        self.sections: list[tuple[str, int]] = []  # (group title, column index)

    def section(self, title: str, column: int) -> int:
        self.sections.append((title, column))
        return len(self.sections) - 1

    def add(self, node_id: int, kind: str, section: int, title: str | None = None, **values) -> int:
        self.nodes.append({"id": node_id, "type": kind, "section": section, "title": title, "values": values})
        return node_id

    # ---------------------------------------------------------------- API format
    def api(self) -> dict:
        prompt = {}
        for n in sorted(self.nodes, key=lambda n: n["id"]):
            inputs = {}
            for key, value in n["values"].items():
                inputs[key] = [str(value[0]), value[1]] if isinstance(value, tuple) else value
            node = {"class_type": n["type"], "inputs": inputs}
            if n["title"]:
                node["_meta"] = {"title": n["title"]}
            prompt[str(n["id"])] = node
        return prompt

    # ---------------------------------------------------------------- layout
    def layout(self) -> tuple[dict[int, tuple[list[int], list[int]]], list[dict], list[int]]:
        """Position and size per node id (the Note is id 0 here, atop column 0), the groups, the bounds."""
        placed: dict[int, tuple[list[int], list[int]]] = {}
        groups = []
        x = right = bottom = 0
        for column in range(max(c for _, c in self.sections) + 1):
            sections = [i for i, (_, c) in enumerate(self.sections) if c == column]
            members = {i: [n for n in self.nodes if n["section"] == i] for i in sections}
            width = max(NODE_SIZE[n["type"]][0] for i in sections for n in members[i])
            y = 0
            if column == 0:
                width = max(width, NOTE_SIZE[0] - 2 * GROUP_PAD)
                placed[0] = ([x, TITLE_H], [width + 2 * GROUP_PAD, NOTE_SIZE[1]])
                y = TITLE_H + NOTE_SIZE[1] + COLUMN_GAP
            for i in sections:
                top = y
                y += GROUP_TITLE_H + TITLE_H
                for n in members[i]:
                    h = NODE_SIZE[n["type"]][1]
                    placed[n["id"]] = ([x + GROUP_PAD, y], [width, h])
                    y += h + NODE_GAP + TITLE_H
                y += GROUP_PAD - NODE_GAP - TITLE_H
                groups.append({"id": len(groups) + 1, "title": self.sections[i][0],
                               "bounding": [x, top, width + 2 * GROUP_PAD, y - top],
                               "color": "#3f789e", "font_size": 24, "flags": {}})
                y += COLUMN_GAP
            bottom = max(bottom, y - COLUMN_GAP)
            right = x + width + 2 * GROUP_PAD
            x = right + COLUMN_GAP
        return placed, groups, [0, 0, right, bottom]

    @staticmethod
    def view(bounds: list[int], boxes: list[tuple[float, float, float, float]]) -> dict:
        """``extra.ds`` that shows ``bounds`` whole in the free part of a 1600x1000 window, clear of the minimap.

        The frontend draws graph point p at (p + offset) * scale.  The graph's top-left corner goes
        to the free area's top-left; the scale is the largest that fits and keeps every box
        (nodes with their title bars, groups) off the minimap.
        """
        left, top = VIEW_MARGIN["left"], VIEW_MARGIN["top"]
        free_w = WINDOW[0] - left - VIEW_MARGIN["right"]
        free_h = WINDOW[1] - top - VIEW_MARGIN["bottom"]
        x0, y0, x1, y1 = bounds
        scale = math.floor(min(free_w / (x1 - x0), free_h / (y1 - y0), 1.0) * 100) / 100
        mx0, my0, mx1, my1 = MINIMAP
        while scale > 0.3:
            screen = [(left + (bx0 - x0) * scale, top + (by0 - y0) * scale, left + (bx1 - x0) * scale, top + (by1 - y0) * scale)
                      for bx0, by0, bx1, by1 in boxes]
            if not any(a < mx1 and mx0 < c and b < my1 and my0 < d for a, b, c, d in screen):
                break
            scale = round(scale - 0.01, 2)
        return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}

    # ---------------------------------------------------------------- UI format
    def ui(self) -> dict:
        placed, groups, bounds = self.layout()
        links, ui_nodes = [], []
        outputs_of: dict[int, list[dict]] = {}
        for n in self.nodes:
            outs = NODE_TYPES[n["type"]][2]
            outputs_of[n["id"]] = [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(outs)]
        for order, n in enumerate(self.nodes):
            linked, widgets, _ = NODE_TYPES[n["type"]]
            inputs = []
            for slot, (name, kind) in enumerate(linked):
                src = n["values"].get(name)
                link_id = None
                if isinstance(src, tuple):
                    link_id = len(links) + 1
                    links.append([link_id, src[0], src[1], n["id"], slot, kind])
                    outputs_of[src[0]][src[1]]["links"].append(link_id)
                elif (n["type"], name) not in OPTIONAL_LINKS:
                    raise ValueError(f"{self.name}: node {n['id']} ({n['type']}) input {name} is not connected")
                entry = {"name": name, "type": kind, "link": link_id}
                if (n["type"], name) in OPTIONAL_LINKS:
                    entry["shape"] = 7  # the frontend's hollow socket for optional inputs
                inputs.append(entry)
            values = []
            for w in widgets:
                values.append(n["values"][w])
                if w == "seed":
                    values.append("fixed")  # control_after_generate
                if n["type"] == "LoadImage":
                    values.append("image")  # the upload widget
            properties = {"Node name for S&R": n["type"]}
            if n["type"] in STOCK_MODELS:
                properties["models"] = STOCK_MODELS[n["type"]]
            pos, size = placed[n["id"]]
            node = {
                "id": n["id"], "type": n["type"], "pos": pos, "size": size, "flags": {}, "order": order,
                "mode": 0, "inputs": inputs, "outputs": outputs_of[n["id"]],
                "properties": properties, "widgets_values": values,
            }
            if n["title"]:
                node["title"] = n["title"]
            ui_nodes.append(node)
        note_id = max(n["id"] for n in self.nodes) + 1
        boxes = [(p[0], p[1] - TITLE_H, p[0] + w, p[1] + h) for p, (w, h) in placed.values()]
        boxes += [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in groups)]
        view = self.view(bounds, boxes)
        pos, size = placed[0]
        ui_nodes.append({
            "id": note_id, "type": "Note", "title": "Read me: files and folders", "pos": pos, "size": size,
            "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [self.note], "color": "#432", "bgcolor": "#653",
        })
        return {
            "last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": view, "davae_title": self.title},
            "version": 0.4,
        }

    def write(self) -> None:
        (OUT / f"{self.name}.json").write_text(json.dumps(self.ui(), indent=1) + "\n")
        (OUT / "api").mkdir(parents=True, exist_ok=True)
        (OUT / "api" / f"{self.name}.json").write_text(json.dumps(self.api(), indent=1) + "\n")


def _files_note(title: str, lora: str, heads: str, extra: str = "") -> str:
    return (
        f"{title}\n\n"
        "Files this workflow needs (ComfyUI/models/...):\n"
        f"- checkpoints/{CKPT}\n  SD3.5 Medium (holds the SD3 VAE), from huggingface.co/stabilityai/stable-diffusion-3.5-medium\n"
        f"- text_encoders/{CLIPS[0]}, {CLIPS[1]}, {CLIPS[2]}\n  from the same repository's text_encoders/ folder (models/clip/ also works)\n"
        f"- davae/{DA_VAE}  (the DA-VAE)\n"
        f"- davae/{heads}  (the DA detail heads)\n"
        f"- loras/{lora}  (the DA LoRA for the transformer blocks)\n"
        f"{extra}"
        "\nNo DA files are published yet. Make them with this pack's trainers: stage 1 "
        "(python -m davae_training.train_tokenizer) writes the DA-VAE, stage 2 "
        "(python -m davae_training.train_adapter) writes the heads and the LoRA; "
        "the README says how."
    )


def _sd35(g: Graph, lora: str, heads: str) -> dict[str, tuple[int, int]]:
    """Files, prompts and the DA-patched model in three columns; returns the sockets later nodes use."""
    files, model, prompts = g.section("1  Files", 0), g.section("2  Model: SD3.5M + DA", 1), g.section("3  Prompts", 1)
    g.add(1, "CheckpointLoaderSimple", files, ckpt_name=CKPT)
    g.add(2, "TripleCLIPLoader", files, clip_name1=CLIPS[0], clip_name2=CLIPS[1], clip_name3=CLIPS[2])
    g.add(8, "DAVAELoader", files, davae_name=DA_VAE, dtype="default", vae=(1, 2))
    g.add(5, "ModelSamplingSD3", model, shift=3.0, model=(1, 0))
    g.add(6, "LoraLoaderModelOnly", model, "DA LoRA", lora_name=lora, strength_model=1.0, model=(5, 0))
    g.add(7, "DASD3ModelPatch", model, heads=heads, model=(6, 0))
    g.add(3, "CLIPTextEncode", prompts, "Positive", text=PROMPT, clip=(2, 0))
    g.add(4, "CLIPTextEncode", prompts, "Negative", text=NEGATIVE, clip=(2, 0))
    return {"stock_model": (5, 0), "da_model": (7, 0), "pos": (3, 0), "neg": (4, 0), "sd3_vae": (1, 2), "da_vae": (8, 0)}


def _ksampler(g: Graph, node_id: int, column: int, model, s, latent, denoise: float = 1.0, title: str | None = None, seed: int = 42):
    return g.add(node_id, "KSampler", column, title, seed=seed, steps=30, cfg=2.5, sampler_name="euler",
                 scheduler="sgm_uniform", denoise=denoise, model=model, positive=s["pos"], negative=s["neg"],
                 latent_image=latent)


def t2i(size: int, lora: str, heads: str) -> Graph:
    tokens = size // 32
    title = f"DA-VAE text-to-image {size}x{size} ({tokens}x{tokens} tokens)"
    g = Graph(f"davae_t2i_{size}", title, _files_note(title, lora, heads))
    s = _sd35(g, lora, heads)
    sample, output = g.section("4  Sample (DA latent)", 2), g.section("5  Decode and save", 3)
    g.add(10, "DAEmptyStructuredLatent", sample, width=size, height=size, batch_size=1)
    _ksampler(g, 11, sample, s["da_model"], s, (10, 0))
    if size <= 1024:  # the stock VAE Decode takes the DA-VAE
        g.add(12, "VAEDecode", output, samples=(11, 0), vae=s["da_vae"])
    else:  # tiles keep 2048 within 8 GB
        g.add(12, "DAStructuredLatentDecode", output, tile_size=1024, overlap=128, samples=(11, 0), vae=s["da_vae"])
    g.add(13, "SaveImage", output, filename_prefix=f"davae_t2i_{size}", images=(12, 0))
    return g


def img2img() -> Graph:
    title = "DA-VAE image-to-image at 1024 through Structured Latent Encode"
    g = Graph("davae_img2img", title,
              _files_note(title, LORA_1024, HEADS_1024, "- input/example.png: the image to edit (ships with ComfyUI)\n"))
    s = _sd35(g, LORA_1024, HEADS_1024)
    image, sample, output = g.section("4  Input image", 2), g.section("5  Encode and sample", 3), g.section("6  Decode and save", 4)
    g.add(9, "LoadImage", image, image="example.png")
    g.add(10, "ImageScale", image, upscale_method="lanczos", width=1024, height=1024, crop="center", image=(9, 0))
    g.add(14, "DAStructuredLatentEncode", sample, tile_size=0, overlap=128, pixels=(10, 0), vae=s["da_vae"])
    _ksampler(g, 11, sample, s["da_model"], s, (14, 0), denoise=0.6)
    g.add(12, "DAStructuredLatentDecode", output, tile_size=0, overlap=128, samples=(11, 0), vae=s["da_vae"])
    g.add(13, "SaveImage", output, filename_prefix="davae_img2img_1024", images=(12, 0))
    return g


def refine_512() -> Graph:
    title = "Stock SD3.5M at 512, refined by DA at 1024 for the token cost of 512"
    g = Graph("davae_refine_512", title, _files_note(title, LORA_1024, HEADS_1024))
    s = _sd35(g, LORA_1024, HEADS_1024)
    stock, stock_out = g.section("4  Stock SD3.5M at 512", 2), g.section("5  Stock result, as a DA latent", 2)
    refine, refine_out = g.section("6  DA refine at 1024", 3), g.section("7  DA result and its base channels", 4)
    g.add(10, "EmptySD3LatentImage", stock, width=512, height=512, batch_size=1)
    _ksampler(g, 11, stock, s["stock_model"], s, (10, 0), title="Stock SD3.5M 512")
    g.add(14, "DALatentFromBase", stock_out, samples=(11, 0))
    g.add(12, "VAEDecode", stock_out, samples=(11, 0), vae=s["sd3_vae"])
    g.add(13, "SaveImage", stock_out, filename_prefix="stock_sd35m_512", images=(12, 0))
    _ksampler(g, 15, refine, s["da_model"], s, (14, 0), denoise=0.6, title="DA refine 1024")
    g.add(18, "DABaseLatent", refine, samples=(15, 0))
    g.add(19, "VAEDecode", refine, "Base channels (stock VAE, 512)", samples=(18, 0), vae=s["sd3_vae"])
    g.add(16, "VAEDecode", refine_out, samples=(15, 0), vae=s["da_vae"])
    g.add(17, "SaveImage", refine_out, filename_prefix="davae_refined_1024", images=(16, 0))
    g.add(20, "PreviewImage", refine_out, images=(19, 0))
    return g


def side_by_side() -> Graph:
    title = "Stock SD3.5M (64x64 tokens) next to DA-VAE (32x32 tokens) at 1024"
    g = Graph("davae_vs_stock_1024", title, _files_note(title, LORA_1024, HEADS_1024))
    s = _sd35(g, LORA_1024, HEADS_1024)
    sample, output = g.section("4  Sample: DA (top), stock (bottom)", 2), g.section("5  Decode and save", 3)
    g.add(14, "DAEmptyStructuredLatent", sample, width=1024, height=1024, batch_size=1)
    _ksampler(g, 15, sample, s["da_model"], s, (14, 0), title="DA-VAE 1024 (32x32 tokens)")
    g.add(10, "EmptySD3LatentImage", sample, "Stock latent 1024", width=1024, height=1024, batch_size=1)
    _ksampler(g, 11, sample, s["stock_model"], s, (10, 0), title="Stock SD3.5M 1024 (64x64 tokens)")
    g.add(16, "VAEDecode", output, samples=(15, 0), vae=s["da_vae"])
    g.add(17, "SaveImage", output, filename_prefix="davae_1024", images=(16, 0))
    g.add(12, "VAEDecode", output, samples=(11, 0), vae=s["sd3_vae"])
    g.add(13, "SaveImage", output, filename_prefix="stock_sd35m_1024", images=(12, 0))
    return g


WORKFLOWS = {
    "davae_t2i_1024": lambda: t2i(1024, LORA_1024, HEADS_1024),
    "davae_t2i_2048": lambda: t2i(2048, LORA_2048, HEADS_2048),
    "davae_img2img": img2img,
    "davae_refine_512": refine_512,
    "davae_vs_stock_1024": side_by_side,
}


def main() -> None:
    for name, build in WORKFLOWS.items():
        build().write()
        print(f"wrote example_workflows/{name}.json and example_workflows/api/{name}.json")


if __name__ == "__main__":
    main()
