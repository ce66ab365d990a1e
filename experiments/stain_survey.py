"""Survey stain normalisation on a data folder: torchstain agreement, QC measurements, and the
Reinhard reference (tissue LAB statistics of images rendered in the Macenko reference appearance).

Usage: python experiments/stain_survey.py ../shared/data/bach_iciar2018 [--out stain_survey.csv]
(about 2 minutes on 2 cores for the 144 shared BACH images)
"""

import argparse
import csv
import sys

import numpy as np
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
from tqdm import tqdm

from histoboost.config import PreprocessConfig
from histoboost.data import load_manifest, read_record
from histoboost.stain import MACENKO_HE_REF, StainError, fit_macenko, macenko_normalize, quality_check, reinhard_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data")
    parser.add_argument("--out", default="stain_survey.csv")
    args = parser.parse_args()
    preprocess = PreprocessConfig()
    manifest, _ = load_manifest(args.data, preprocess)
    reference = NumpyMacenkoNormalizer()
    rows, lab_means, lab_stds = [], [], []
    for record in tqdm(manifest, desc="images"):
        rgb = read_record(record, preprocess)
        try:
            fit = fit_macenko(rgb)
        except StainError as err:
            print(f"{record.name}: {err}", file=sys.stderr)
            continue
        ours = macenko_normalize(rgb, fit=fit)
        qc = quality_check(rgb, ours, fit, MACENKO_HE_REF)
        try:
            with np.errstate(all="ignore"):
                theirs, _, _ = reference.normalize(rgb, stains=False)
            theirs_flags = "; ".join(quality_check(rgb, theirs, fit, MACENKO_HE_REF).flags)
            # Same algorithm with torchstain's all-channel tissue rule: must agree to the level.
            same_rule = macenko_normalize(rgb, fit=fit_macenko(rgb, rule="all"))
            diff = int(np.abs(same_rule.astype(int) - theirs.astype(int)).max())
        except (np.linalg.LinAlgError, StainError, ValueError) as err:
            theirs_flags, diff = f"failed: {err}", -1
        if qc.ok:
            means, stds = reinhard_stats(ours)
            lab_means.append(means)
            lab_stds.append(stds)
        rows.append(
            {
                "name": record.name,
                "label": record.label,
                "max_abs_diff_vs_torchstain_same_rule": diff,
                "torchstain_flags": theirs_flags,
                "tissue_before": qc.tissue_before,
                "tissue_after": qc.tissue_after,
                "od_before": qc.od_before,
                "od_after": qc.od_after,
                "he_angle": qc.he_angle,
                "flags": "; ".join(qc.flags),
            }
        )
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"wrote {args.out}: {len(rows)} images; flagged: histoboost {sum(1 for r in rows if r['flags'])}, "
        f"torchstain {sum(1 for r in rows if r['torchstain_flags'])}; largest difference from torchstain with "
        f"its tissue rule: {max(r['max_abs_diff_vs_torchstain_same_rule'] for r in rows)} levels"
    )
    print(
        "Reinhard reference (LAB means, stds over QC-passing images):",
        np.round(np.mean(lab_means, axis=0), 1),
        np.round(np.mean(lab_stds, axis=0), 1),
    )


if __name__ == "__main__":
    main()
