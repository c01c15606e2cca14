"""Tools built on the backend: `hf-fna compare` (`compare`), `calibrate` (`calibration`), `inspect` (`inspection`),
`push-config` (`publish`), and what they share: timing, machine and image helpers (`measure`), the linear probe
(`probe`), the FNA command-line options (`arguments`) and checked, atomic output files (`outputs`)."""
