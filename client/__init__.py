"""Client side: photo dataset, ED-LoRA trainer and the mos-client command."""
