"""The thesis' unimodal layer-averaged distillation (section 3.1.1.1; docs/methods.md "Unimodal layer-averaged
distillation"): one student tower, its frozen teacher of the same modality, and the layer-averaged
representations of both.

`model(images, tokens)` returns {"prediction": the student's layer average [B, T, D], "target": the teacher's
[B, T, D], "keep": tokens that count in the loss [B, T] (text: not pad) or None}; the loss is
`alignlab.losses.layer_averaged_kd_loss`. Image: the student is a timm ViT (first k blocks of the teacher),
the teacher an `alignlab.teachers.Teacher` with a ViT-like backbone, both seeing the same crop. Text: the
student an `HFTextTower`, the teacher a transformers encoder, both reading the same ids.
"""

from __future__ import annotations

import torch
from torch import nn

from alignlab.losses.layer_average import layer_averaged_target
from alignlab.models.frozen_teacher import FrozenTeacherTask, block_outputs

MODALITIES = ("image", "text")


class LayerAveragedKD(FrozenTeacherTask):
    def __init__(self, student: nn.Module, teacher: nn.Module, modality: str, *, final_ln: bool,
                 include_embeddings: bool, input_mean=(), input_std=()):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"unimodal.modality={modality!r} is not one of {MODALITIES}")
        self.student, self.teacher, self.modality = student, teacher, modality
        self.final_ln, self.include_embeddings = final_ln, include_embeddings
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.freeze_teacher()

    @property
    def image_tower(self) -> nn.Module:
        """The student as the image tower (`alignlab.evaluate` probes and fine-tunes it)."""
        if self.modality != "image":
            raise AttributeError("a text distillation run has no image tower")
        return self.student

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.set_grad_checkpointing(enable)

    def _image_layers(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = self.student.model
        _, student_layers = block_outputs(student, lambda: student.forward_features(images),
                                          include_input=self.include_embeddings)
        with torch.no_grad():
            prepared = self.teacher.prepare(images, self.input_mean, self.input_std)
            teacher = self.teacher.backbone.model
            _, teacher_layers = block_outputs(teacher, lambda: teacher.forward_features(prepared),
                                              include_input=self.include_embeddings)
        return student_layers, teacher_layers

    def _text_layers(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        keep = tokens != self.student.pad_id
        mask = keep.long()
        first = 0 if self.include_embeddings else 1  # hidden_states[0] is the embedding output
        student = self.student.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        with torch.no_grad():
            teacher = self.teacher(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        return list(student.hidden_states[first:]), list(teacher.hidden_states[first:]), keep

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        keep = None
        if self.modality == "image":
            student_layers, teacher_layers = self._image_layers(images)
        else:
            student_layers, teacher_layers, keep = self._text_layers(tokens)
        if student_layers[0].shape != teacher_layers[0].shape:
            raise ValueError(f"unimodal distillation: student tokens {tuple(student_layers[0].shape)} and teacher "
                             f"tokens {tuple(teacher_layers[0].shape)} differ: give the student the teacher's "
                             "width, patch size and image size")
        with torch.no_grad():
            target = layer_averaged_target(teacher_layers, final_ln=self.final_ln)
        return {"prediction": layer_averaged_target(student_layers, final_ln=self.final_ln), "target": target,
                "keep": keep}
