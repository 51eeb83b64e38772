"""Configuration: typed pools, suites and the paper registry read from ``suites/`` (YAML), and the
seeded samplers that give every method the same subsets and documents."""
