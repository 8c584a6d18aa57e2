"""Human labels: writing them (`labels`), choosing what to label next (`plan`), and the local
labeling page (`server`)."""
