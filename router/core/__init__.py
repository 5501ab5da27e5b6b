"""Pure logic: no sockets, no clocks of their own, no trio. Everything here is unit-testable."""
