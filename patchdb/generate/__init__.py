"""The generate stage: load a model, find its layers, render the prompt, compute concept
vectors, and fill the sweep's rollouts."""
