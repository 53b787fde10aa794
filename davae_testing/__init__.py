"""Test scaffolding: stand-ins for what the tiny test files cannot provide, and the in-process ComfyUI runner.

Never part of the node pack: ComfyUI's custom-node import of this repository never reaches it
(``tests/test_pack_structure.py``), ``.comfyignore`` leaves it out of the Comfy Registry
package, and pip does not install it (only ``davae_core`` and ``davae_training`` are packages).
Tests import it from the checkout (``tests/conftest.py`` puts the repository on ``sys.path``);
the demo's ComfyUI step runs :mod:`.comfyui_runner` as a file from the checkout.

* :mod:`.comfyui_runner`: boots a real ComfyUI on CPU with the pack as a custom node and runs
  prompts through ComfyUI's own executor (ComfyUI's environment only: no diffusers);
* :mod:`.checkout`: ``davae_training`` importable from a checkout pip did not install;
* :mod:`.tiny_sd3_pipeline`: a whole diffusers SD3 folder around a tiny transformer and VAE,
  with random-weight CLIP-L / CLIP-G / T5 and offline tokenizers (training's environment).
"""
