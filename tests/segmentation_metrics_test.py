"""mIoU and pixel accuracy on hand-made confusion matrices."""
import numpy as np
import pytest

from spade_jax import segmentation_metrics as sm


def test_scores_of_a_hand_made_matrix():
  # Rows ground truth, columns prediction. Class 3 is absent from both (its
  # row and column are zero): excluded. Class 2 is predicted but never in
  # the ground truth: IoU 0, counted.
  matrix = np.array([[8, 2, 0, 0],
                     [1, 5, 4, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]])
  s = sm.scores(matrix)
  iou0 = 8 / (8 + 2 + 1)
  iou1 = 5 / (5 + 1 + 4 + 2)
  assert s['miou'] == pytest.approx((iou0 + iou1 + 0.0) / 3)
  assert s['accuracy'] == pytest.approx(13 / 20)
  assert s['num_classes_present'] == 3
  assert s['num_pixels'] == 20


def test_perfect_and_all_wrong():
  assert sm.scores(np.diag([3, 0, 7]))['miou'] == 1.0
  assert sm.scores(np.diag([3, 0, 7]))['accuracy'] == 1.0
  wrong = sm.scores(np.array([[0, 4], [6, 0]]))
  assert wrong['miou'] == 0.0 and wrong['accuracy'] == 0.0


def test_confusion_matrix_ignores_dont_care_and_accumulates_over_split():
  label = np.array([[0, 1, -1], [255, 2, 2]])
  pred = np.array([[0, 2, 1], [0, 2, 0]])
  m = sm.confusion_matrix(label, pred, 3)
  want = np.zeros((3, 3), np.int64)
  want[0, 0] = 1
  want[1, 2] = 1
  want[2, 2] = 1
  want[2, 0] = 1
  np.testing.assert_array_equal(m, want)
  acc = sm.ConfusionMatrix(3)
  acc.add(label, pred)
  acc.add(label[None], pred[None])
  np.testing.assert_array_equal(acc.matrix, 2 * want)
  assert acc.num_images == 2
  # One matrix over the split, not a mean of per-image scores: image A is
  # all class 0 right (100 px), image B class 1 half right (2 px).
  split = sm.ConfusionMatrix(2)
  split.add(np.zeros((10, 10), int), np.zeros((10, 10), int))
  split.add(np.array([[1, 1]]), np.array([[1, 0]]))
  assert split.scores()['miou'] == pytest.approx((100 / 101 + 1 / 2) / 2)
  assert split.scores()['accuracy'] == pytest.approx(101 / 102)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='same shape'):
    sm.confusion_matrix(np.zeros(3), np.zeros(4), 2)
  with pytest.raises(ValueError, match=r'\[0, 2\)'):
    sm.confusion_matrix(np.zeros(3), np.array([0, 1, 2]), 2)
  with pytest.raises(ValueError, match="don't-care"):
    sm.scores(np.zeros((2, 2)))
  with pytest.raises(ValueError, match='square'):
    sm.scores(np.zeros((2, 3)))
