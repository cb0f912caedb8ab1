"""Offline task family for meta-training and evaluating small_fc_lopt (see family.py)."""
from lopt_ext.tasks.base import Task
from lopt_ext.tasks.family import (CharLMSpec, ConvSpec, LogRegSpec, MLPSpec, OUT_OF_FAMILY_SPECS,
                                   QuadraticSpec, SPLITS, TEST_SPECS, TRAIN_SPECS, TaskSampler,
                                   get_task, list_tasks, make_task, task_name)

__all__ = ["Task", "CharLMSpec", "ConvSpec", "LogRegSpec", "MLPSpec", "QuadraticSpec", "SPLITS",
           "TRAIN_SPECS", "TEST_SPECS", "OUT_OF_FAMILY_SPECS", "TaskSampler", "get_task",
           "list_tasks", "make_task", "task_name"]
