"""The standing fault campaign (issue 9): random faults under live workloads, every point judged."""
