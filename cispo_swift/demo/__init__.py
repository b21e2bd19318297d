"""Demos, tasks, the tiny CPU model, the real model and plotting: beside the library, never imported by it."""
