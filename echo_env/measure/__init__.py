"""From request records and server counters to figures: statistics, token ceilings, one measured phase."""
