"""Wire formats: msgspec Structs for every body the router reads or writes."""
