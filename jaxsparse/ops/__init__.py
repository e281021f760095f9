"""Pure functions on arrays; each has an XLA reference and an ``implementation=`` switch."""
