"""A RAHF-style ("Rich Human Feedback", Liang et al., CVPR 2024) heatmap and score model.

* :mod:`focusnfix.rahf.model`: ViT image encoder + transformer text encoder fused by
  self-attention; heatmap heads (implausibility, misalignment) and score heads (plausibility,
  alignment, aesthetics, overall).
* :mod:`focusnfix.rahf.data`: RichHF-18K records (read, and written for tests) and the training dataset;
* :mod:`focusnfix.rahf.tfrecord`: TFRecord files and ``tf.train.Example`` protobufs without TensorFlow.
* :mod:`focusnfix.rahf.train`: MSE training loop.
* :mod:`focusnfix.rahf.evaluate`: metrics as pure functions (MSE, CC, KLD, SIM, NSS, AUC-Judd;
  PLCC/SRCC) and the evaluation loop.
* :mod:`focusnfix.rahf.aspect`: a trained model as a focusnfix aspect (type ``rahf``).
* ``focusnfix rahf train | eval``: in :mod:`focusnfix.cli` and :mod:`focusnfix.commands`.
"""
