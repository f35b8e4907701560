"""What every layer shares, one copy each: errors, value checks, constants, array conversions,
the config builder and the run directory's file names. Imports no other flmnist package."""
