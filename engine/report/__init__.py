"""What a run reports: the statistics against `random` and the HTML report with its figures. Pure: no Ray."""
