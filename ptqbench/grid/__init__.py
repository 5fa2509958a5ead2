"""The experiment grid: checks before work, the plan of cells, running one cell, executors, the results store."""
