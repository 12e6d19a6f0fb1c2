"""The shared 3D-IRCADb patients the tests use."""

PATIENTS = ("3Dircadb1.1", "3Dircadb1.7", "3Dircadb1.17")
# The bundled model is trained on all three shared patients (training/results/RESULTS.md gives its
# leave-one-out numbers), so end-to-end checks on this patient guard the pipeline (reading,
# geometry, writing), not generalisation to unseen patients.
TEST_PATIENT = "3Dircadb1.17"
