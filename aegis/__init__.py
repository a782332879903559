"""AEGIS core: what every stage shares (the soul, its schedule, checkpoint I/O, loading a model, run metrics, the
embedded tiny model). train/, export/ and serve/ import it; it imports none of them."""
