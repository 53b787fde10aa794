"""Writes the shipped workflows: a UI-format graph (ComfyUI's frontend opens it) and its
API-format twin (``POST /prompt``, headless runs) from one description, so the two cannot drift.

    python workflows/build_workflows.py        # rewrites workflows/*.json and workflows/api/*.json

UI graphs sit directly in ``workflows/``, where ComfyUI offers every ``*.json`` in its
Templates browser; the API twins sit in ``workflows/api/``, which it does not list.

Each graph carries a Note naming the files it needs and where they go.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Files the workflows expect (SD3.5 Medium from Stability AI; DA files from our trainers).
CKPT = "sd3.5_medium.safetensors"
CLIPS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
DA_VAE = "davae_sd35m.safetensors"
LORA_1024, HEADS_1024 = "da_sd35m_1024_lora.safetensors", "da_sd35m_1024_heads.safetensors"
LORA_2048, HEADS_2048 = "da_sd35m_2048_lora.safetensors", "da_sd35m_2048_heads.safetensors"
PROMPT = "a photograph of a red fox in a snowy birch forest at golden hour, highly detailed fur"
NEGATIVE = "blurry, low quality, deformed"

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


class Graph:
    def __init__(self, name: str, title: str, files: str):
        self.name, self.title, self.files = name, title, files
        self.nodes: list[dict] = []

    def add(self, node_id: int, kind: str, pos: tuple[int, int], title: str | None = None, **values) -> int:
        self.nodes.append({"id": node_id, "type": kind, "pos": list(pos), "title": title, "values": values})
        return node_id

    # ---------------------------------------------------------------- API format
    def api(self) -> dict:
        prompt = {}
        for n in self.nodes:
            inputs = {}
            for key, value in n["values"].items():
                inputs[key] = [str(value[0]), value[1]] if isinstance(value, tuple) else value
            node = {"class_type": n["type"], "inputs": inputs}
            if n["title"]:
                node["_meta"] = {"title": n["title"]}
            prompt[str(n["id"])] = node
        return prompt

    # ---------------------------------------------------------------- UI format
    def ui(self) -> dict:
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
            size = [320, 60 + 26 * (len(widgets) + len(linked))]
            node = {
                "id": n["id"], "type": n["type"], "pos": n["pos"], "size": size, "flags": {}, "order": order,
                "mode": 0, "inputs": inputs, "outputs": outputs_of[n["id"]],
                "properties": {"Node name for S&R": n["type"]}, "widgets_values": values,
            }
            if n["title"]:
                node["title"] = n["title"]
            ui_nodes.append(node)
        note_id = max(n["id"] for n in self.nodes) + 1
        ui_nodes.append({
            "id": note_id, "type": "Note", "pos": [0, 600], "size": [700, 190], "flags": {},
            "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [self.files], "color": "#432", "bgcolor": "#653",
        })
        return {
            "last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [480, 320]}, "davae_title": self.title},
            "version": 0.4,
        }

    def write(self) -> None:
        (HERE / f"{self.name}.json").write_text(json.dumps(self.ui(), indent=1) + "\n")
        (HERE / "api").mkdir(exist_ok=True)
        (HERE / "api" / f"{self.name}.json").write_text(json.dumps(self.api(), indent=1) + "\n")


def _files_note(lora: str, heads: str, extra: str = "") -> str:
    return (
        "Files this workflow needs:\n"
        f"- models/checkpoints/{CKPT}  (SD3.5 Medium, holds the SD3 VAE)\n"
        f"- models/text_encoders/{CLIPS[0]}, {CLIPS[1]}, {CLIPS[2]}  (SD3 text encoders; models/clip/ also works)\n"
        f"- models/davae/{DA_VAE}  (DA-VAE tokenizer)\n"
        f"- models/davae/{heads}  (DA heads P', O')\n"
        f"- models/loras/{lora}  (DA LoRA for the MMDiT blocks)\n"
        f"{extra}"
        "Make the DA files with the trainers in this repository (see README); none are published."
    )


def _sd35(g: Graph, lora: str, heads: str, x0: int = 0) -> dict[str, tuple[int, int]]:
    """Checkpoint, text encoders, prompts and the DA-patched model; returns the sockets later nodes use."""
    g.add(1, "CheckpointLoaderSimple", (x0, 0), ckpt_name=CKPT)
    g.add(2, "TripleCLIPLoader", (x0, 180), clip_name1=CLIPS[0], clip_name2=CLIPS[1], clip_name3=CLIPS[2])
    g.add(3, "CLIPTextEncode", (x0 + 380, 180), "Positive", text=PROMPT, clip=(2, 0))
    g.add(4, "CLIPTextEncode", (x0 + 380, 420), "Negative", text=NEGATIVE, clip=(2, 0))
    g.add(5, "ModelSamplingSD3", (x0 + 380, 0), shift=3.0, model=(1, 0))
    g.add(6, "LoraLoaderModelOnly", (x0 + 760, 0), "DA LoRA", lora_name=lora, strength_model=1.0, model=(5, 0))
    g.add(7, "DASD3ModelPatch", (x0 + 1140, 0), heads=heads, model=(6, 0))
    g.add(8, "DAVAELoader", (x0 + 1140, 560), davae_name=DA_VAE, dtype="default", vae=(1, 2))
    return {"stock_model": (5, 0), "da_model": (7, 0), "pos": (3, 0), "neg": (4, 0), "sd3_vae": (1, 2), "da_vae": (8, 0)}


def _ksampler(g: Graph, node_id: int, pos, model, s, latent, denoise: float = 1.0, title: str | None = None, seed: int = 42):
    return g.add(node_id, "KSampler", pos, title, seed=seed, steps=30, cfg=2.5, sampler_name="euler",
                 scheduler="sgm_uniform", denoise=denoise, model=model, positive=s["pos"], negative=s["neg"],
                 latent_image=latent)


def t2i(size: int, lora: str, heads: str) -> Graph:
    tokens = size // 32
    g = Graph(f"davae_t2i_{size}", f"DA-VAE text-to-image {size}x{size} ({tokens}x{tokens} tokens)", _files_note(lora, heads))
    s = _sd35(g, lora, heads)
    g.add(10, "DAEmptyStructuredLatent", (760, 300), width=size, height=size, batch_size=1)
    _ksampler(g, 11, (1520, 0), s["da_model"], s, (10, 0))
    if size <= 1024:  # the stock VAE Decode takes the DA-VAE
        g.add(12, "VAEDecode", (1900, 0), samples=(11, 0), vae=s["da_vae"])
    else:  # tiles keep 2048 within 8 GB
        g.add(12, "DAStructuredLatentDecode", (1900, 0), tile_size=1024, overlap=128, samples=(11, 0), vae=s["da_vae"])
    g.add(13, "SaveImage", (2240, 0), filename_prefix=f"davae_t2i_{size}", images=(12, 0))
    return g


def img2img() -> Graph:
    g = Graph("davae_img2img", "DA-VAE image-to-image at 1024 through Structured Latent Encode",
              _files_note(LORA_1024, HEADS_1024, "- input/ : the image to edit (LoadImage; example.png ships with ComfyUI)\n"))
    s = _sd35(g, LORA_1024, HEADS_1024)
    g.add(9, "LoadImage", (0, 700), image="example.png")
    g.add(10, "ImageScale", (380, 700), upscale_method="lanczos", width=1024, height=1024, crop="center", image=(9, 0))
    g.add(14, "DAStructuredLatentEncode", (1520, 560), tile_size=0, overlap=128, pixels=(10, 0), vae=s["da_vae"])
    _ksampler(g, 11, (1520, 0), s["da_model"], s, (14, 0), denoise=0.6)
    g.add(12, "DAStructuredLatentDecode", (1900, 0), tile_size=0, overlap=128, samples=(11, 0), vae=s["da_vae"])
    g.add(13, "SaveImage", (2240, 0), filename_prefix="davae_img2img_1024", images=(12, 0))
    return g


def refine_512() -> Graph:
    g = Graph("davae_refine_512", "Stock SD3.5M at 512, refined by DA at 1024 for the token cost of 512",
              _files_note(LORA_1024, HEADS_1024))
    s = _sd35(g, LORA_1024, HEADS_1024)
    g.add(10, "EmptySD3LatentImage", (760, 300), width=512, height=512, batch_size=1)
    _ksampler(g, 11, (1140, 300), s["stock_model"], s, (10, 0), title="Stock SD3.5M 512")
    g.add(12, "VAEDecode", (1520, 700), samples=(11, 0), vae=s["sd3_vae"])
    g.add(13, "SaveImage", (1900, 700), filename_prefix="stock_sd35m_512", images=(12, 0))
    g.add(14, "DALatentFromBase", (1520, 300), samples=(11, 0))
    _ksampler(g, 15, (1900, 0), s["da_model"], s, (14, 0), denoise=0.6, title="DA refine 1024")
    g.add(16, "VAEDecode", (2280, 0), samples=(15, 0), vae=s["da_vae"])
    g.add(17, "SaveImage", (2620, 0), filename_prefix="davae_refined_1024", images=(16, 0))
    g.add(18, "DABaseLatent", (2280, 300), samples=(15, 0))
    g.add(19, "VAEDecode", (2620, 300), "Base channels (stock VAE, 512)", samples=(18, 0), vae=s["sd3_vae"])
    g.add(20, "PreviewImage", (2960, 300), images=(19, 0))
    return g


def side_by_side() -> Graph:
    g = Graph("davae_vs_stock_1024", "Stock SD3.5M (64x64 tokens) next to DA-VAE (32x32 tokens) at 1024",
              _files_note(LORA_1024, HEADS_1024))
    s = _sd35(g, LORA_1024, HEADS_1024)
    g.add(10, "EmptySD3LatentImage", (760, 300), "Stock latent 1024", width=1024, height=1024, batch_size=1)
    _ksampler(g, 11, (1520, 700), s["stock_model"], s, (10, 0), title="Stock SD3.5M 1024 (64x64 tokens)")
    g.add(12, "VAEDecode", (1900, 700), samples=(11, 0), vae=s["sd3_vae"])
    g.add(13, "SaveImage", (2240, 700), filename_prefix="stock_sd35m_1024", images=(12, 0))
    g.add(14, "DAEmptyStructuredLatent", (760, 460), width=1024, height=1024, batch_size=1)
    _ksampler(g, 15, (1520, 0), s["da_model"], s, (14, 0), title="DA-VAE 1024 (32x32 tokens)")
    g.add(16, "VAEDecode", (1900, 0), samples=(15, 0), vae=s["da_vae"])
    g.add(17, "SaveImage", (2240, 0), filename_prefix="davae_1024", images=(16, 0))
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
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
