"""Training the embedded `tiny-dualfocus` checkpoint on a synthetic zoom-in task (see README.md).

`training.task` defines the task (scenes, questions, answers, boxes) and needs only Pillow, so the
evaluation (clients/eval) imports it without the training's dependencies.
"""
