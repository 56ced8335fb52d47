"""multifd: live migration of guest RAM and device state over parallel channel processes."""
