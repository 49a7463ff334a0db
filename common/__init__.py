"""Shared by client and server: base models, ED-LoRA layers, concept packages, sampling."""
