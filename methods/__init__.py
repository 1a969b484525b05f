"""Built-in transfer methods, one module each; every module registers its classes with `register_method`."""
