"""`soberana bench`: the load generator, workloads, reports and plots (HTTP only, no torch)."""
