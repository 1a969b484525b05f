"""Built-in tasks, one package each (code, README with the protocol and version); each registers with `register_task`."""
