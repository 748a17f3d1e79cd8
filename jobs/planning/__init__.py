"""The planning layer, before Ray starts: a job resolved once (resolve.py), the run planned against what the
output holds (plan.py), shards cut into work units for the actors (units.py). No Ray and no torch here."""
