#!/usr/bin/env python3
"""MediaPipe's own face mesh (the `mediapipe` wheel's Python FaceMesh, static image mode).

usage: face_mesh.py IMAGE MAX_FACES
Prints JSON: a list of faces, each a list of 468 [x, y] points in the image's pixels
(MediaPipe's normalised coordinates times the image's width and height).
"""
import json
import sys

import cv2
import mediapipe as mp


def main():
    path, max_faces = sys.argv[1], int(sys.argv[2])
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        sys.exit("cannot read " + path)
    h, w = image.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, max_num_faces=max_faces, refine_landmarks=False
    ) as mesh:
        found = mesh.process(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    faces = [
        [[p.x * w, p.y * h] for p in face.landmark]
        for face in (found.multi_face_landmarks or [])
    ]
    json.dump(faces, sys.stdout)


if __name__ == "__main__":
    main()
