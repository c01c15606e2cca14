"""Tools built on the backend: `hf-fna compare` (`compare`), `calibrate` (`calibration`), `inspect` (`inspection`),
`push-config` (`publish`), and what they share: the measurement pipeline of a model's exact and FNA variants
(`pipeline`), what `--model` names, the device, the machine and progress bars (`measure`), the linear probe (`probe`),
the FNA command-line options (`arguments`) and checked, atomic output files (`outputs`)."""
