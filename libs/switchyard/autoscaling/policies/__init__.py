"""One module per scaling policy; each defines one `ScalingPolicy` subclass with a `name`."""
