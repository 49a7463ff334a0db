"""Centre node: registry, fusion engine, Flower ServerApp."""
