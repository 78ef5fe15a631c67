"""The protocol layer: each API's wire format to and from the one internal request and event model."""
