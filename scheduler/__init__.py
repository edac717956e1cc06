"""scheduler: the public front door; runs tool commands as soon as the model writes them."""
