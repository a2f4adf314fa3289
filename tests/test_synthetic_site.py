"""Site styles of the synthetic phantoms: the same patients as another scanner renders them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidscan.data.synthetic import SITES, SiteStyle, make_phantom, write_phantom_dataset
from covidscan.errors import ConfigError


def test_default_site_changes_nothing_and_scanner_b_shrinks_blurs_and_adds_noise():
    plain = make_phantom(3, covid=True)
    assert np.array_equal(make_phantom(3, covid=True, site="default").image, plain.image)
    other = make_phantom(3, covid=True, site="scanner-b")
    fov = SITES["scanner-b"].fov
    # Wider field of view: the lungs cover about 1/fov^2 of the area they covered.
    assert other.lung_mask.sum() / plain.lung_mask.sum() == pytest.approx(1 / fov**2, rel=0.1)
    assert other.lesion_mask.sum() > 0 and not (other.lesion_mask & ~other.lung_mask).any()
    # Noise shows in the lungs' pixel-to-pixel differences even though the resolution is halved.
    rough = [np.abs(np.diff(p.image, axis=1))[p.lung_mask[:, 1:]].mean() for p in (plain, other)]
    assert rough[1] > rough[0]
    assert np.array_equal(make_phantom(3, covid=True, site="scanner-b").image, other.image)  # deterministic


def test_site_only_changes_rendering_not_the_patients(tmp_path):
    a = pd.read_csv(write_phantom_dataset(tmp_path / "a", n=8, slices_per_patient=2))
    b = pd.read_csv(write_phantom_dataset(tmp_path / "b", n=8, slices_per_patient=2, site="scanner-b"))
    assert a[["label", "patient_id"]].equals(b[["label", "patient_id"]])


def test_bad_sites_are_refused():
    with pytest.raises(ConfigError, match="site='scanner-z' is unknown: use one of default, scanner-b"):
        make_phantom(0, covid=False, site="scanner-z")
    with pytest.raises(ConfigError, match="resolution in \\(0, 1\\]"):
        SiteStyle(resolution=2.0)
