"""lineinspect.fusion"""
