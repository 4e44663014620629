"""Project-wide utilities every package uses: command-line conventions, atomic file output, configs."""
