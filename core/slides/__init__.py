"""Whole-slide images: a slide opened through OpenSlide at a known microns per pixel (reader.py), its
tissue found on the thumbnail and each tile checked (tissue.py), and a grid of tiles at a chosen
microns per pixel over that tissue, read back in bounded batches (tiling.py).

Tiles are cut by physical scale (microns per pixel), not by pyramid level, as CLAM, Slideflow,
TIAToolbox and WSInfer do, so slides from scanners with different objectives give tiles of the same
scale. Imports only core.errors; ingest and prediction build on it.
"""
