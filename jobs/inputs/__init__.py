"""The inputs layer: discovering input files by identity (discovery.py), reading them as record batches in each
format (formats.py), and the model's identity (checksum.py: its checksum and pinned files). No Ray, no torch."""
