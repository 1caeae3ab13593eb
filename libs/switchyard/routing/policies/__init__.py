"""One module per routing policy; each defines one `RoutingPolicy` subclass with a `name`."""
