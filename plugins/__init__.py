"""Built-in vaeflow components, registered through the `vaeflow` entry-point group like any plugin."""
