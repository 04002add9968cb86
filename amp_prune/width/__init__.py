"""Width pruning: unit scores (criteria/), the per-block budget, and the planner."""
